"""The stage graph derived from params.yaml (dvc.yaml is written from it) and what `dvc repro` would run."""
