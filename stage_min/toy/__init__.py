"""The toy STAGE model a CPU can build: synthetic songs, a small codec, a tiny random base, the recipe (python -m stage_min.toy)."""
