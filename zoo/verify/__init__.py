"""The machinery that checks entries: the contract battery, the catalogue's claims, the benchmark.
It imports entries through the registry; no entry imports it."""
