"""Packaging a trained adapter for distribution (package.py, `python3 llama_package.py`) and
verifying a package (verify.py, `python3 llama_package.py --verify NAME.tar.gz`)."""
