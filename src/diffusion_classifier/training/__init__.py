"""Training the small models this package ships (`train`): the trainer, and the pairs and triples layouts of
composite images."""
