"""kdpipe library code that is not a stage: reusable pieces the stages are built from."""
