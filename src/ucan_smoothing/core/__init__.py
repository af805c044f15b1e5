"""The mathematics: noise families, certified regions, the smoothed classifier, its statistics.

Nothing here imports anything outside ``core``; everything else builds on it.

* :mod:`.norms`, :mod:`.statistics`: lp norms by name; Clopper-Pearson bounds and PREDICT's test.
* :mod:`.noises`: one class per isotropic family: sampling and native certificates.
* :mod:`.regions`, :mod:`.anisotropic`: the certified region ``||delta / sigma||_p <= R`` and the
  fixed ``eps * sigma + mu`` noise of Theorem 3.2.
* :mod:`.certificate`, :mod:`.streams`: what CERTIFY returns; where the noise's randomness comes from.
* :mod:`.smooth`: ``Smooth``, Cohen et al.'s PREDICT and CERTIFY.
* :mod:`.sequential`: fewer samples for a fixed question (one radius, PREDICT), with proofs.
* :mod:`.grid`: the largest certified radius of a grid, stopping once it is settled (proof inside).
* :mod:`.pool`: many images in flight in full forward batches, each with its own noise stream.
"""
