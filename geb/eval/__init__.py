"""Evaluation: MMLU / C-Eval / CMMLU under named protocols (mcq), perplexity and bits per byte (ppl),
ToxiGen-style toxicity (toxicity), tables and charts (report) and the lm-eval bridge (lmeval)."""
