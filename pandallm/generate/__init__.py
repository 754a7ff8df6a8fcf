"""Generation: sampling options and batched, left-padded, seeded generation, shared by `predict`, `chat` and the
generation metrics of validation."""
