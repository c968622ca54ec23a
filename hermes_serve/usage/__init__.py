"""What keys used: the usage ledger (``store``: rows and hourly rollups; ``writer``: queued,
batched, spilled, replayed; ``reports``: the reads), and a key's limits as it stands
(``standing``). ``python -m hermes_serve.usage`` reads them for operators."""
