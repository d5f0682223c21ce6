"""What a hospital runs: local training and evaluation, and the Flower ClientApp adapter."""
