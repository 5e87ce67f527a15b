"""Service packages: one folder per service; installed as `stratamesh.services.<name>`."""
