"""Disaggregated LLM serving with typed gRPC contracts."""
