"""Using a trained model: the interactive chat of `python3 llama_chat.py` (chat.py), on an
adapter folder, a package archive, a merged model folder or a base model."""
