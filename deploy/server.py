"""``diffss-serve``: serve an exported model repository (Triton layout) with onnxruntime.

    diffss-serve --model-repository models/repo [--host 127.0.0.1] [--port 8080]
                 [--max-body-bytes 67108864] [--token SECRET] [--max-image-side 4096] ...

The token may also come from the DIFFSS_SERVE_TOKEN environment variable (keeps it out of
``ps`` output). See deploy/README.md for the routes.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys

from deploy.images import ImageLimits
from deploy.runtime import BACKGROUND_NICENESS
from serving_contract import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE_DELAY_MS, DEFAULT_MAX_QUEUE_SIZE

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 64 << 20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_large_frees_to_the_os(threshold: int = 1 << 20) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own mmap, unmapped when freed.

    glibc raises its mmap threshold to the size of the largest block freed (up to 32 MiB), after
    which decoded images come from its heaps and their pages stay with the process: one large
    request used to leave the server hundreds of megabytes bigger. A fixed threshold stops that.
    Returns False where the C library is not glibc.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffss-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", required=True, help="folder in Triton layout (<model>/<version>/model.onnx)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s; 0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s)")
    parser.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest accepted request body, after decompression (default %(default)s)")
    parser.add_argument("--token", default=os.environ.get("DIFFSS_SERVE_TOKEN") or None,
                        help="bearer token required on every route but /v2/health/* (default: $DIFFSS_SERVE_TOKEN, else none)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDAExecutionProvider where a GPU is usable, else CPU")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per physical core)")
    parser.add_argument("--max-concurrency", type=positive_int, default=1,
                        help="onnxruntime runs executing at once (default %(default)s: each run uses all cores)")
    parser.add_argument("--support-cache-size", type=positive_int, default=256, help="registered support sets kept (LRU)")
    parser.add_argument("--support-cache-bytes", type=positive_int, default=1 << 30, help="memory bound of that cache")
    parser.add_argument("--max-shots", type=positive_int, default=32,
                        help="most support images per request, on the people's routes and in v2 tensors (shots axis)")
    parser.add_argument("--max-image-side", type=positive_int, default=ImageLimits.max_side,
                        help="largest width/height of an uploaded PNG/JPEG, read from its header (default %(default)s)")
    parser.add_argument("--max-request-pixels", type=positive_int, default=ImageLimits.max_request_pixels,
                        help="all uploaded images and masks of one request together (default %(default)s)")
    parser.add_argument("--image-workers", type=positive_int, default=2,
                        help="threads decoding/encoding images at once; bounds their memory (default %(default)s)")
    parser.add_argument("--max-tensor-side", type=positive_int, default=None,
                        help="largest height/width of a v2 image tensor (default: each model's diffss.max_input_side)")
    parser.add_argument("--max-batch-size", type=positive_int, default=DEFAULT_MAX_BATCH_SIZE,
                        help="dynamic batching: most rows run as one onnxruntime call (1: no batching; default %(default)s)")
    parser.add_argument("--max-queue-delay-ms", type=non_negative_float, default=DEFAULT_MAX_QUEUE_DELAY_MS,
                        help="dynamic batching: longest the oldest queued request waits for others (default %(default)s)")
    parser.add_argument("--max-queue-size", type=positive_int, default=DEFAULT_MAX_QUEUE_SIZE,
                        help="requests waiting per model; more get 503 with Retry-After (default %(default)s)")
    parser.add_argument("--request-timeout-ms", type=non_negative_float, default=0,
                        help="deadline of a request without its own (v2 parameters.timeout, microseconds); "
                             "past it the answer is 504 (default 0: none)")
    parser.add_argument("--run-niceness", type=int, default=BACKGROUND_NICENESS, choices=range(0, 20), metavar="0..19",
                        help="nice levels of the onnxruntime and image threads below the event loop (default %(default)s)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from deploy.app import create_app
    from deploy.batching import BatchingConfig
    from deploy.runtime import load_repository
    from deploy.support_cache import SupportCache

    return_large_frees_to_the_os()
    try:
        models = load_repository(args.model_repository, device=args.device, intra_op_threads=args.threads,
                                 niceness=args.run_niceness)
        app = create_app(
            models,
            max_body_bytes=args.max_body_bytes,
            token=args.token,
            support_cache=SupportCache(args.support_cache_size, args.support_cache_bytes),
            max_concurrency=args.max_concurrency,
            max_shots=args.max_shots,
            image_limits=ImageLimits(args.max_image_side, args.max_request_pixels),
            image_workers=args.image_workers,
            max_tensor_side=args.max_tensor_side,
            batching=BatchingConfig(args.max_batch_size, args.max_queue_delay_ms, args.max_queue_size),
            request_timeout_ms=args.request_timeout_ms or None,
            run_niceness=args.run_niceness,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"diffss-serve: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                timeout_keep_alive=65)
    return 0


if __name__ == "__main__":
    sys.exit(main())
