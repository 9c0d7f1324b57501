"""The commands, one module each: cli.py imports one when its command runs; they never import each other."""
