"""A real small LLaVA-style VLM: CLIP ViT (trained on easy-VQA) → projector → SmolLM2-135M-Instruct."""
