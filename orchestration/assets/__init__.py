"""Assets, one module per stage: data -> generation -> training -> evaluation -> delivery."""
