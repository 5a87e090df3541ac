"""Tokenizers glmtune builds itself instead of running a model folder's Python code."""

from .chatglm import ChatGLMTokenizer, ChatGLMv1Tokenizer, load_chatglm_tokenizer

__all__ = ["ChatGLMTokenizer", "ChatGLMv1Tokenizer", "load_chatglm_tokenizer"]
