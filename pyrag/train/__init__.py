"""Training loops: the DPR retriever (train/retriever.py) and joint RAG fine-tuning (train/rag.py)."""
