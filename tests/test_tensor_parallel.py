"""Tensor and expert parallelism (qwen3vl.parallel, issue 22): ``LLM(..., tensor_parallel_size=N)``
against one process on tiny random checkpoints (dense and MoE), with text, image and video
prompts decoded together in one continuous batch.

Bounds: fp32 logits within 1e-5 of the max |logit| at every step, greedy tokens identical. In
bf16 / int8 / int4 the all-reduce sums partial products in another order than one process's
GEMM (and the int8 kernels round activations per shard), so logits differ by ~1e-3 relative:
logits within 2e-2 (bf16) / 4e-2 (int8, int4) of the max |logit| while both runs saw the same
tokens (an int8 row-split projection has per-shard row scales: another, equally fine rounding
of its weights than one process's; int4 groups never straddle shards), and tokens
identical except from a step where the single process's top-2 margin is within twice the
observed discrepancy (such a near-tie may legitimately flip; the sequences part there).
"""
from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import qwen3vl
from conftest import fresh_home, home_env
from processor_fixtures import write_video
from qwen3vl.engine.llm import ShardedModelError
from qwen3vl.parallel import RankFailure, ShardPlan
from qwen3vl.parallel.shard import sharded_linear
from qwen3vl.quant import QuantLinear
from qwen3vl.random_checkpoint import TINY_CONFIG, TINY_MOE_CONFIG, write_random_checkpoint


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with home_env(fresh_home(tmp_path_factory)) as path:
        yield path


def _checkpoint(home: str, name: str, config: dict) -> str:
    """The demo checkpoint's tokenizer and processor files with random weights of ``config``."""
    from qwen3vl.demo import demo_checkpoint

    path = os.path.join(home, name)
    if not os.path.isdir(path):
        shutil.copytree(demo_checkpoint(), path)
        for f in os.listdir(path):
            if f.endswith(".safetensors"):
                os.remove(os.path.join(path, f))
        write_random_checkpoint(path, config, seed=3)
    return path


@pytest.fixture(scope="module")
def ckpts(home):
    tied = {**TINY_CONFIG, "tie_word_embeddings": True}  # dense: tied lm_head (the 2B's layout)
    tied["text_config"] = {**TINY_CONFIG["text_config"], "tie_word_embeddings": True}
    moe64 = {**TINY_MOE_CONFIG, "text_config": {**TINY_MOE_CONFIG["text_config"], "moe_intermediate_size": 64}}
    return {"dense": _checkpoint(home, "dense", tied), "moe": _checkpoint(home, "moe", TINY_MOE_CONFIG),
            "moe64": _checkpoint(home, "moe64", moe64)}


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    clip = write_video(str(tmp_path_factory.mktemp("clip") / "clip.mp4"), 8, fps=4, width=64, height=64)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    user = lambda *c: [{"role": "user", "content": list(c)}]  # noqa: E731
    return [user({"type": "text", "text": "Count from one to ten."}),
            user({"type": "image", "image": Image.fromarray(pixels)}, {"type": "text", "text": "What is this?"}),
            user({"type": "video", "video": clip}, {"type": "text", "text": "What happens?"})]


def _run(llm, conversations, tokens: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy answers of the conversations decoded as one batch -> (token ids per conversation,
    per conversation the raw logits (steps, V) of each step)."""
    steps: dict[tuple, list] = {}

    def record(reqs, logits, _processed):
        for r, row in zip(reqs, logits):
            steps.setdefault(tuple(r.prompt_ids.tolist()), []).append(row.float().clone())

    llm.engine.on_logits = record
    results = llm.chat(conversations, max_tokens=tokens, min_new_tokens=tokens, temperature=0, presence_penalty=0,
                       mm_processor_kwargs={"fps": 2})
    llm.engine.on_logits = None
    order = [tuple(llm.request(c, llm.sampling_params()).prompt_ids.tolist()) for c in conversations]
    return [r.token_ids for r in results], [torch.stack(steps[k]) for k in order]


def _compare(single, tp, exact: bool, bound: float = 2e-2) -> None:
    (ids1, logits1), (ids2, logits2) = single, tp
    for a, b, la, lb in zip(ids1, ids2, logits1, logits2):
        if exact:
            scale = la.abs().max()
            n = min(len(la), len(lb))
            assert ((la[:n] - lb[:n]).abs().max() / scale) <= 1e-5
            assert a == b
            continue
        n = min(len(la), len(lb), len(a), len(b))
        d = next((i for i in range(n) if a[i] != b[i]), n)  # first differing token
        m = min(d + 1, n)  # steps whose logits saw the same tokens in both runs
        err = (la[:m] - lb[:m]).abs().amax(-1)  # (m,) the TP discrepancy per step
        assert (err / la[:m].abs().amax(-1)).max() <= bound
        if d < n:  # a flip only at a near-tie: top-2 margin within twice the discrepancy
            top = la[d].topk(2).values
            assert top[0] - top[1] <= 2 * err[d], f"token {d} differs with margin {float(top[0] - top[1]):.4f}"


@pytest.mark.parametrize("kind,size,ep", [("dense", 2, False), ("moe", 2, False), ("moe", 2, True), ("dense", 4, False)])
def test_fp32_parity(ckpts, conversations, kind, size, ep):
    """fp32: logits <= 1e-5 relative and identical greedy tokens (TP 4 replicates the 2 KV heads)."""
    single = qwen3vl.LLM(ckpts[kind], dtype="float32", max_num_seqs=4)
    want = _run(single, conversations, 8)
    tp = qwen3vl.LLM(ckpts[kind], dtype="float32", max_num_seqs=4, tensor_parallel_size=size, enable_expert_parallel=ep)
    try:
        got = _run(tp, conversations, 8)
        with pytest.raises(ShardedModelError, match="use LLM.chat"):  # rank 0's shard cannot run alone
            tp.model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=1)
    finally:
        tp.shutdown()
    _compare(want, got, exact=True)


@pytest.mark.parametrize("kind,quant,ep", [("dense", None, False), ("dense", "int8", False), ("dense", "int4", False),
                                           ("moe", None, True), ("moe", "int8", False), ("moe", "int8", True),
                                           ("moe64", "int4", False), ("moe64", "int4", True)])
def test_low_precision_greedy(ckpts, conversations, kind, quant, ep):
    """bf16 / int8 / int4: greedy tokens as one process's, up to the first near-tie. (The tiny MoE
    has no int4 form: its 48-wide expert inputs take no int4 group size; "moe64" has 64-wide
    experts, 32 columns per rank when split.)"""
    kw = dict(dtype="bfloat16", quantization=quant, group_size=32, max_num_seqs=4)
    single = qwen3vl.LLM(ckpts[kind], **kw)
    want = _run(single, conversations, 8)
    tp = qwen3vl.LLM(ckpts[kind], tensor_parallel_size=2, enable_expert_parallel=ep, **kw)
    try:
        got = _run(tp, conversations, 8)
    finally:
        tp.shutdown()
    _compare(want, got, exact=False, bound=2e-2 if quant is None else 4e-2)


def test_rank_death_and_shutdown(ckpts):
    """A killed rank fails the next call with a message naming it (no hang); shutdown stops all."""
    llm = qwen3vl.LLM(ckpts["dense"], dtype="float32", tensor_parallel_size=2)
    msgs = [{"role": "user", "content": "hi"}]
    assert llm.chat(msgs, max_tokens=2, temperature=0).token_ids
    worker = llm.parallel.procs[0]
    os.kill(worker.pid, signal.SIGKILL)
    t = time.monotonic()
    with pytest.raises(RankFailure, match="rank 1 .* died"):
        for _ in range(50):  # the monitor notices within a fraction of a second
            llm.chat(msgs, max_tokens=2, temperature=0)
            time.sleep(0.1)
    assert time.monotonic() - t < 30
    llm.shutdown()
    ok = qwen3vl.LLM(ckpts["dense"], dtype="float32", tensor_parallel_size=2)
    procs = list(ok.parallel.procs)
    ok.shutdown()
    assert all(p.poll() is not None for p in procs)


def test_bad_sizes(ckpts):
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        qwen3vl.LLM(ckpts["dense"], tensor_parallel_size=0)
    with pytest.raises(ValueError, match=r"tensor parallel size 3 must divide the number of attention heads \(4\)"):
        ShardPlan(0, 3).kv_heads(4, 2)
    assert [ShardPlan(r, 4).kv_heads(4, 2) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    from qwen3vl import cli
    from qwen3vl.server.settings import ServeSettings

    s = cli.serve_settings(cli.build_parser().parse_args(["serve", "--tensor-parallel-size", "2",
                                                          "--enable-expert-parallel"]))
    assert (s.tensor_parallel_size, s.enable_expert_parallel) == (2, True)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1, got 0"):
        ServeSettings(tensor_parallel_size=0)
    with torch.device("meta"):
        down = QuantLinear(192, 64, "int4", 64)
    with pytest.raises(ValueError, match="int4 group size 64 must divide each rank's 96 input columns"):
        sharded_linear(down, 64, [(0, 64, 0)], ShardPlan(0, 2).split(192, "x"), "sum")


def test_serve_tensor_parallel(home, ckpts):
    """``qwen3vl serve --tensor-parallel-size 2`` through the openai client answers as one process
    does (text and an image); killing a rank stops the server with a message naming it."""
    pytest.importorskip("openai")
    from test_server import ServerProcess

    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    chats = [[{"role": "user", "content": "Say something."}],
             [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                           {"type": "text", "text": "Describe it."}]}]]
    single = qwen3vl.LLM(ckpts["dense"], dtype="float32")
    want = [single.chat([{"role": "user", "content": [{"type": "image", "image": Image.fromarray(pixels)},
                                                      {"type": "text", "text": "Describe it."}]}]
                        if i else c, max_tokens=6, temperature=0).text for i, c in enumerate(chats)]
    srv = ServerProcess(home, "--model", ckpts["dense"], "--dtype", "float32", "--tensor-parallel-size", "2")
    try:
        client = srv.client()
        got = [client.chat.completions.create(model="dense", messages=c, max_tokens=6, temperature=0)
               .choices[0].message.content for c in chats]
        assert got == want
        with open(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children") as f:
            worker = int(f.read().split()[0])
        os.kill(worker, signal.SIGKILL)
        srv.proc.wait(30)  # the server stops by itself
        assert "rank 1" in srv.output() and "died" in srv.output()
    finally:
        if srv.proc.poll() is None:
            srv.stop()


CLIENT = """
import sys, time, httpx
url = sys.argv[1]
for _ in range(600):
    try:
        if httpx.get(url + "/health", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
r = httpx.post(url + "/v1/chat/completions", timeout=60, json={"model": "dense", "max_tokens": 6, "temperature": 0,
               "messages": [{"role": "user", "content": "Say something."}]})
print(repr(r.json()["choices"][0]["message"]["content"]))
"""


def _netns(tag: str) -> list[str]:
    """Two network namespaces joined by a veth pair (10.77.0.1 / .2) -> their names; skips with
    the reason when this machine does not allow it."""
    if shutil.which("ip") is None:
        pytest.skip("multi-host test: the `ip` tool (iproute2) is missing")
    ns = [f"q3tp{tag}a", f"q3tp{tag}b"]
    steps = [["netns", "add", ns[0]], ["netns", "add", ns[1]],
             ["link", "add", f"q3v{tag}a", "type", "veth", "peer", "name", f"q3v{tag}b"]]
    for i in range(2):
        dev = f"q3v{tag}{'ab'[i]}"
        steps += [["link", "set", dev, "netns", ns[i]], ["-n", ns[i], "addr", "add", f"10.77.0.{i + 1}/24", "dev", dev],
                  ["-n", ns[i], "link", "set", dev, "up"], ["-n", ns[i], "link", "set", "lo", "up"]]
    for step in steps:
        r = subprocess.run(["ip", *step], capture_output=True, text=True)
        if r.returncode:
            _drop(ns)
            pytest.skip(f"multi-host test: cannot build network namespaces here (ip {' '.join(step)}: {r.stderr.strip()})")
    return ns


def _drop(ns: list[str]) -> None:
    for n in ns:
        subprocess.run(["ip", "netns", "del", n], capture_output=True)  # takes its veth end along


def test_multi_host_torchrun(home, ckpts):
    """Two network namespaces joined by a veth pair act as two hosts: ``torchrun --nnodes 2`` runs
    ``qwen3vl serve --tensor-parallel-size 2`` across them and answers as one process does."""
    ns = _netns(str(os.getpid() % 100000))
    want = qwen3vl.LLM(ckpts["dense"], dtype="float32").chat([{"role": "user", "content": "Say something."}],
                                                             max_tokens=6, temperature=0).text
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    procs = []
    try:
        for r in (1, 0):
            env = {**os.environ, "GLOO_SOCKET_IFNAME": f"q3v{ns[r][4:-1]}{'ab'[r]}", "QWEN3VL_TP_THREADS": "1"}
            cmd = ["ip", "netns", "exec", ns[r], torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
                   str(r), "--master-addr", "10.77.0.1", "--master-port", "29533", "-m", "qwen3vl.cli", "serve",
                   "--model", ckpts["dense"], "--dtype", "float32", "--tensor-parallel-size", "2",
                   "--served-model-name", "dense", "--port", "18080"]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        out = subprocess.run(["ip", "netns", "exec", ns[0], sys.executable, "-c", CLIENT, "http://127.0.0.1:18080"],
                             capture_output=True, text=True, timeout=300)
        assert out.stdout.strip() == repr(want), out.stderr
        procs[1].terminate()  # rank 0's torchrun: the server stops, then rank 1 exits on its own
        procs[0].wait(60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        _drop(ns)
