"""`python -m stage_min.toy OUT`: rebuild the shipped toy STAGE model from nothing (recipe.py says how)."""
from .recipe import main

main()
