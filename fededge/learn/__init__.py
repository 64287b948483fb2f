"""Learning without a network: datasets and partitioners, the student zoo, training and the KD
loss, weights, aggregation of logits, local differential privacy."""
