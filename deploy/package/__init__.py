"""Packaging for a target: container images and compose files (image.py) and the OpenXLab app
bundle (app_bundle.py), made from the templates in templates/ (the repository's docker/ and app/)."""
