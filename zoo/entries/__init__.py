"""One file per catalogue entry, named after its id (`bp-transformer` -> `bp_transformer.py`)."""
