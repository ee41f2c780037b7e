"""`eflow repro`: retrain and re-evaluate the rows of EFlow Tables 2, 3 and 4 at a chosen scale."""
