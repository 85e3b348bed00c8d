"""`python -m deploy.serve.healthcheck`: exit 0 when the local server is ready (GET /health/ready: the
model is loaded and has generated), for Docker's HEALTHCHECK."""

import os
import sys
import urllib.request

if __name__ == "__main__":
    port = os.environ.get("XLAB_DEPLOY_PORT", "7860")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=4) as reply:
            sys.exit(0 if reply.status == 200 else 1)
    except OSError:  # starting (503), refused, or timed out
        sys.exit(1)
