import sys

from deploy.cli import main

if __name__ == "__main__":  # LMDeploy's start-up check spawns processes that re-import this
    sys.exit(main())
