"""Command line: ``qwen3vl chat``, ``qwen3vl serve``, ``qwen3vl bench``.

``qwen3vl chat`` with a PROMPT answers once; without one it opens a multi-turn session on stdin
(``/image PATH`` and ``/video PATH`` attach media to the next message, ``/reset`` clears the
conversation, ``/exit`` or Ctrl-D quits). Without ``--model`` it runs on the tiny random-weight
demo checkpoint. A Thinking model's reasoning is printed before the answer (dimmed on a terminal;
``--hide-reasoning`` leaves it out); ``--boxes OUT.png`` draws the answer's boxes and points on the
image asked about (qwen3vl.cli_output).
"""
from __future__ import annotations

import argparse
import os
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: tiny random demo)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--quantization", default=None, choices=["int8", "int4", "fp8"],
                   help="weight-only quantization of the text decoder, done while loading (fp8: keep an -FP8 "
                        "checkpoint's weights, CUDA only; on the CPU an -FP8 checkpoint loads into --dtype or int8/int4)")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size (32, 64 or 128)")
    p.add_argument("--rope-scaling", default=None, metavar="JSON",
                   help='text RoPE scaling over config.json\'s, e.g. \'{"rope_type": "yarn", "factor": 3.0, '
                        '"original_max_position_embeddings": 262144}\' (YaRN; raise --max-model-len with it)')


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def _sampling_kwargs(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "min_p": args.min_p, "presence_penalty": args.presence_penalty,
            "repetition_penalty": args.repetition_penalty, "seed": args.seed}


def _user_message(text: str, images: list[str], videos: list[str]) -> dict:
    content = [{"type": "image", "image": os.path.abspath(i)} for i in images]
    content += [{"type": "video", "video": os.path.abspath(v)} for v in videos]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def _answer(llm, history: list[dict], sampling: dict, out, show_reasoning: bool = True) -> str | None:
    """Stream one reply to ``out`` (a Thinking model's reasoning first, dimmed on a terminal);
    returns the answer text, or None after printing an error."""
    from .cli_output import ReplyPrinter

    printer = ReplyPrinter(out, show_reasoning, dim=out.isatty())
    try:
        result = None
        for delta in llm.stream_chat(history, **sampling):
            printer.write(delta)
            result = delta.result or result
        printer.finish()
        if result is not None and result.finish_reason == "length":
            print(f"[stopped after {result.usage.completion_tokens} tokens: --max-new-tokens]", file=sys.stderr)
        return result.text if result else ""
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def _draw_boxes(args, image: str | None, answer: str | None) -> None:
    """``--boxes OUT.png``: the answer's boxes / points drawn on ``image`` (the turn's first image)."""
    if not args.boxes or answer is None:
        return
    from .cli_output import boxes_message, save_boxes

    if image is None:
        print("[--boxes: this message had no image to draw on]", file=sys.stderr)
        return
    try:
        print(boxes_message(save_boxes(image, answer, args.boxes), args.boxes))
    except (ValueError, OSError) as e:
        print(f"error: --boxes: {e}", file=sys.stderr)


def _repl(llm, args, sampling: dict) -> int:
    history: list[dict] = []
    images, videos = list(args.image), list(args.video)
    drawn_on = None  # the image --boxes draws on: the first one of the latest message that had one
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message. /image PATH, /video PATH attach media; /reset clears; /exit or Ctrl-D quits.")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history, images, videos, drawn_on = [], [], [], None
            print("[conversation cleared]")
            continue
        if line.startswith(("/image ", "/video ")):
            kind, path = line.split(" ", 1)
            path = os.path.expanduser(path.strip())
            if not os.path.isfile(path):
                print(f"error: no such file: {path}", file=sys.stderr)
                continue
            (images if kind == "/image" else videos).append(path)
            print(f"[{kind[1:]} attached: {path}]")
            continue
        if line.startswith("/"):
            print(f"error: unknown command {line.split()[0]} (use /image, /video, /reset, /exit)", file=sys.stderr)
            continue
        history.append(_user_message(line, images, videos))
        drawn_on = images[0] if images else drawn_on
        images, videos = [], []
        reply = _answer(llm, history, sampling, sys.stdout, not args.hide_reasoning)
        if reply is None:
            history.pop()
        else:
            history.append({"role": "assistant", "content": reply})  # the answer only, not the reasoning
            _draw_boxes(args, drawn_on, reply)


def cmd_chat(args) -> int:
    from .engine.api import LLM

    for f in args.image + args.video:
        if not os.path.isfile(f) and not f.startswith(("http://", "https://")):
            print(f"error: no such file: {f}", file=sys.stderr)
            return 2
    if args.boxes and args.prompt and not args.image:
        print("error: --boxes needs an --image to draw on", file=sys.stderr)
        return 2
    if args.boxes and args.image and args.image[0].startswith(("http://", "https://")):
        print("error: --boxes draws on a local image file; download it and pass its path to --image",
              file=sys.stderr)
        return 2
    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              quantization=args.quantization, group_size=args.group_size, rope_scaling=args.rope_scaling)
    if llm.is_demo:
        print(f"[qwen3vl demo] {_demo_notice()}", file=sys.stderr)
    sampling = _sampling_kwargs(args)
    if args.prompt:
        msg = _user_message(" ".join(args.prompt), args.image, args.video)
        answer = _answer(llm, [msg], sampling, sys.stdout, not args.hide_reasoning)
        _draw_boxes(args, args.image[0] if args.image else None, answer)
        return 0 if answer is not None else 1
    return _repl(llm, args, sampling)


def _demo_notice() -> str:
    from .demo import DEMO_NOTICE

    return DEMO_NOTICE


def _names(values: list[str] | None) -> tuple[str, ...] | None:
    """A list flag given as separate words and/or comma-separated ones."""
    if values is None:
        return None
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


def serve_settings(args):
    """``qwen3vl serve``'s arguments as the server's typed settings (raises ValueError when invalid)."""
    from .server.settings import ServeSettings, parse_limit_mm_per_prompt

    mm = parse_limit_mm_per_prompt(args.limit_mm_per_prompt) if args.limit_mm_per_prompt else {}
    return ServeSettings(
        model=args.model, host=args.host, port=args.port, api_key=args.api_key,
        served_model_name=args.served_model_name, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        allowed_local_media_path=args.allowed_local_media_path, dtype=args.dtype, device=args.device,
        quantization=args.quantization, group_size=args.group_size, rope_scaling=args.rope_scaling, **mm,
        max_media_pixels=args.max_media_pixels, max_media_frames=args.max_media_frames,
        max_media_mb=args.max_media_bytes,
        media_fetch_timeout=args.media_fetch_timeout, allowed_media_domains=_names(args.allowed_media_domains),
        allow_private_media=args.allow_private_media, media_workers=args.media_workers,
        max_body_mb=args.max_body_mb, allowed_hosts=_names(args.allowed_hosts),
        allowed_origins=_names(args.allowed_origins), prefix_cache_gb=args.prefix_cache_gb,
        enable_prefix_caching=args.enable_prefix_caching, max_num_batched_tokens=args.max_num_batched_tokens,
        tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel)


def cmd_serve(args) -> int:
    settings = serve_settings(args)
    from .server.serve import serve

    return serve(settings)


def cmd_bench(argv: list[str]) -> int:
    from .bench import main as bench_main

    return bench_main(argv)


def _add_serve_limit_args(p: argparse.ArgumentParser) -> None:
    """Request and media limits of ``qwen3vl serve`` (defaults: ServeSettings; README, Serving)."""
    p.add_argument("--limit-mm-per-prompt", default=None, metavar="JSON",
                   help='media parts per request, e.g. \'{"image": 4, "video": 1}\' (default: one of each, as vLLM)')
    p.add_argument("--max-media-pixels", type=int, default=2_097_152,
                   help="source pixels of one image or video frame (also the most a resize option may ask for)")
    p.add_argument("--max-media-frames", type=int, default=32, help="frames kept from one video")
    p.add_argument("--max-media-bytes", type=float, default=32.0, metavar="MB",
                   help="download size of one remote image or video, in MiB")
    p.add_argument("--media-fetch-timeout", type=float, default=30.0, metavar="S",
                   help="seconds for the whole download of one remote item")
    p.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="DOMAIN",
                   help="fetch remote media only from these hosts and their subdomains")
    p.add_argument("--allow-private-media", action="store_true",
                   help="allow remote media on loopback / private / link-local addresses (refused by default)")
    p.add_argument("--media-workers", type=int, default=4, help="threads preparing requests with media")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="request body cap in MiB")
    p.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                   help="Host header values to answer ('*': any; default: the bind host and localhost names, "
                        "any when bound to 0.0.0.0 or ::)")
    p.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                   help="web origins allowed to call the API from a browser (CORS; off by default)")
    p.add_argument("--prefix-cache-gb", type=float, default=2.0, metavar="GB",
                   help="memory for KV blocks reused across requests (a chat's later turns prefill only what is new)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse cached prompt prefixes and vision features (--no-enable-prefix-caching: off)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, metavar="N",
                   help="prompt tokens one step prefills while other requests decode: a longer prompt (a video) "
                        "is prefilled in chunks between their tokens")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="shard the text decoder over N ranks (processes on this host, or the ranks of torchrun)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE with --tensor-parallel-size: whole experts per rank instead of every expert split")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3vl", description="Run Qwen3-VL models: chat, serve, bench.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="chat with a model (one-shot with PROMPT, interactive without)")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--image", action="append", default=[], help="image file or URL (repeatable)")
    chat.add_argument("--video", action="append", default=[], help="video file or URL")
    chat.add_argument("--max-model-len", type=int, default=None)
    chat.add_argument("--hide-reasoning", action="store_true",
                      help="do not print a Thinking model's reasoning (printed dimmed before the answer by default)")
    chat.add_argument("--boxes", default=None, metavar="OUT.png",
                      help="draw the boxes / points of the answer on the (first) --image and save it to OUT.png")
    chat.add_argument("prompt", nargs="*", help="the question; omit for an interactive session")
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--max-num-seqs", type=int, default=8)
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--allowed-local-media-path", default=None)
    _add_serve_limit_args(serve)
    serve.set_defaults(func=cmd_serve)

    # Listed for --help; its options are parsed by qwen3vl.bench itself (see main()).
    sub.add_parser("bench", help="benchmark against the reference implementation (qwen3vl bench -h)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
