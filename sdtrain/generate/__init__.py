"""`sdtrain generate`: text from a trained model in one process, a token at a time through a
KV cache, streamed to the terminal as it is decoded (what nanoGPT's sample.py does after training)."""
