"""The library behind the llama_*.py stage scripts: one package whose folders are the
architecture (data/, modeling/, training/, evaluation/, packaging/) over the shared errors,
command-line, file, layout and config modules. See ../shared/ARCHITECTURE.md or README.md."""
