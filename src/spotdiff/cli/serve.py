"""``spotdiff serve``: the HTTP inspection service."""

from __future__ import annotations

import argparse

from spotdiff.cli.options import device_parent


# ----------------------------------------------------------------------------- serve
def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        parents=[device_parent("(torch backend)")],
        help="serve fitted detectors over HTTP (micro-batched, audited, authenticated)",
        description="An inspection service: POST an image to /v1/models/NAME/predict, get the "
        "calibrated decision; every answer is appended to the audit log first. "
        "See docs/serve.md.",
    )
    p.add_argument(
        "model_dirs",
        nargs="+",
        metavar="MODEL_DIR",
        help="calibrated model directory (served under its folder name) or NAME=DIR",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; others need an API key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--backend", choices=["torch", "onnxruntime"], default="torch", help="torch (default) or onnxruntime"
    )
    p.add_argument(
        "--onnx",
        action="append",
        default=None,
        metavar="FILE",
        help="ONNX file from `spotdiff export`; repeat it, one per MODEL_DIR in order (--backend onnxruntime)",
    )
    p.add_argument(
        "--audit-log",
        default="audit.jsonl",
        metavar="FILE",
        help="JSON-lines audit log, appended (default audit.jsonl in the working directory)",
    )
    p.add_argument(
        "--api-key-file",
        default=None,
        metavar="FILE",
        help="accepted bearer keys, one per line (also $SPOTDIFF_API_KEYS, comma-separated)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow this browser origin (repeatable; default: CORS off)",
    )
    p.add_argument("--max-batch", type=int, default=8, help="most images per model batch (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill (default 5)")
    p.add_argument("--max-queue", type=int, default=64, help="requests in progress per model before 503 (default 64)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MiB (default 20)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image, width x height (default 40e6)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a score before 504 (default 30)")
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from spotdiff.errors import ConfigError

    try:
        from spotdiff.serve import ServeConfig, read_api_keys, serve
    except ModuleNotFoundError as exc:
        raise ConfigError(f'spotdiff serve needs {exc.name}: pip install "spotdiff[serve]"') from exc
    config = ServeConfig(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        request_timeout_s=args.timeout,
        api_keys=read_api_keys(args.api_key_file),
        cors_origins=tuple(args.cors_origin),
    )
    serve(
        args.model_dirs,
        host=args.host,
        port=args.port,
        backend=args.backend,
        onnx_files=args.onnx,
        audit_log=args.audit_log,
        config=config,
        device=args.device,
    )
    return 0
