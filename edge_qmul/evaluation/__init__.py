"""The paper-style comparison of unlearning methods, on the host: splits and runs (``protocol``),
intervals (``stats``), the suite that tunes and evaluates every setting (``suite``), and the tables
and plots it writes (``report``). ``tools/evaluate.py`` is its command line."""
