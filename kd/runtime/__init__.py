"""What every method family needs: asking teachers through the cache, tokenisation, scoring and judges,
model directories, initialisation, the logits store, device and dtype."""
