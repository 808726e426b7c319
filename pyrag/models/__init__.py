"""Encoders (DPR / any HF encoder), generators and the RagSequence / RagToken models with their decoding."""
