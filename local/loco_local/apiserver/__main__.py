"""Run the API server alone: ``python -m loco_local.apiserver --port 8001 --kubeconfig /tmp/kc``."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from .kubeconfig import write_kubeconfig
from .server import APIServer


async def _serve(args: argparse.Namespace) -> None:
    server = APIServer(host=args.host, port=args.port, log_root=args.log_root)
    await server.start()
    if args.kubeconfig:
        write_kubeconfig(args.kubeconfig, server.url)
    print(f"serving on {server.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log-root", type=Path, default=None, help="<log_root>/<ns>/<pod>/<container>.log")
    parser.add_argument("--kubeconfig", type=Path, default=None, help="write a kubeconfig for the server here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
