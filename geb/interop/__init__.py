"""Interoperability: geb folders to and from Hugging Face Llama, GGUF (llama.cpp), and the released GEB-1.3B.

- `geb.interop.common`: reading a geb folder tensor by tensor, RoPE layout permutations, and writing an
  imported model as a validated geb folder.
- `geb.interop.gguf`: `export_gguf` (f32/f16/bf16/q8_0/q4_0) and `import_gguf` (llama architecture).
- `geb.interop.hf`: `export_hf` and `import_hf` (LlamaForCausalLM, no custom code).
- `geb.interop.geb_release`: `import_geb_release` for the released GEB-1.3B (Megatron/ChatGLM names) and
  its `--verify` convention search.
- `geb.interop.spm`: SentencePiece model → `tokenizers` object (for the GEB-1.3B vocabulary).

Nothing here is imported by the model, training or inference code.
"""
