"""Data and checkpoint tools: the library behind the thin ``tools/*.py`` command lines.

Why a package: the scripts in ``tools/`` must stay importable from tests and from other
code (the trainer loads the checkpoints :mod:`ckpt_format` defines), so each script is
three lines calling ``megatron_sat.tools.<module>.main(argv)``.

Modules, one concept each:

- :mod:`cli`: one-line user errors, progress bar, atomic outputs.
- :mod:`fetch_demo_data`: real demo corpora and tokenizer from pip packages.
- :mod:`text_cleaning`, :mod:`text_tokenizer`, :mod:`indexed_writer`,
  :mod:`preprocess_data`: raw text to Megatron ``.bin/.idx``.
- :mod:`vocab_merge`, :mod:`embedding_resize`, :mod:`extend_vocab`: Chinese vocabulary
  extension and checkpoint resizing.
- :mod:`ckpt_format`, :mod:`hf_llama`, :mod:`llama_layout`, :mod:`convert_checkpoint`:
  HF Llama ⇄ megatron-sat checkpoints.
- :mod:`eval_ppl`: sliding-window perplexity per domain.
"""
