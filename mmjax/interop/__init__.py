"""Interoperability: open_clip / OpenAI CLIP weight conversion and torch / safetensors files read without torch."""
