"""Run the API server alone, on loopback: ``python -m loco_local.apiserver --port 8001 --kubeconfig /tmp/kc``.

It serves HTTPS with a certificate from a CA made in ``pki/`` beside the kubeconfig. The kubeconfig (written
0600) holds the CA and the bearer token every request needs; the token is never printed."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from loco_local.pki import serving_context

from .kubeconfig import write_kubeconfig
from .server import APIServer


async def _serve(args: argparse.Namespace) -> None:
    pki_dir = args.kubeconfig.resolve().parent / "pki"
    ca, ssl_context = serving_context(pki_dir, ["127.0.0.1"])
    server = APIServer(host="127.0.0.1", port=args.port, log_root=args.log_root, ssl_context=ssl_context)
    await server.start()
    write_kubeconfig(args.kubeconfig, server.url, token=server.token, ca=ca)
    print(f"serving on {server.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log-root", type=Path, default=None, help="<log_root>/<ns>/<pod>/<container>.log")
    parser.add_argument("--kubeconfig", type=Path, required=True,
                        help="write the server's kubeconfig, with its token, here (0600)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
