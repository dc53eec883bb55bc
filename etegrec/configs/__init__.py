"""Packaged named configs: ml-100k (default), paper, tiny (YAML files read by etegrec.config)."""
