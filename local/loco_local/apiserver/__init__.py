"""The embedded cluster's Kubernetes-API-compatible server (for kubectl, the ``kubernetes`` client, kopf).

    from loco_local.apiserver import APIServer, write_kubeconfig
    server = APIServer(host="127.0.0.1", port=0, log_root=Path("state/pods"))
    await server.start()       # server.url -> "http://127.0.0.1:PORT"
    write_kubeconfig(path, server.url, token=server.token)   # every request needs the token (0600 file)
    await server.stop()
"""

from .errors import APIError
from .kubeconfig import write_kubeconfig
from .server import APIServer

__all__ = ["APIServer", "APIError", "write_kubeconfig"]
