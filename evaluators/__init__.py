"""Built-in evaluator plug-ins, shipped as ``soup.evaluators`` and registered under the
``soup.evaluators`` entry-point group: perplexity, command, python, table, lm-eval (the last needs the
``lm-eval`` extra)."""
