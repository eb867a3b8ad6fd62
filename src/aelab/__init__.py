"""Deep and denoising autoencoders on MNIST and Fashion-MNIST."""
