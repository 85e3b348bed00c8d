"""The benchmark: a matrix of settings (runner.py), each measured in a fresh process (worker.py)
through the kit's own server and client (load.py), scored on the user's tasks (scoring.py), and
written up as one report (report.py)."""
