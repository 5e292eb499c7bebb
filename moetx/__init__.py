"""moetx: parallelism for Mixture-of-Experts transformers as composable, checked transforms."""
