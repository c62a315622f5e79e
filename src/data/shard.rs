//! Each rank's share of a global batch.
//!
//! `train.batch_size` is the global batch. Rank `r` of `R` takes consecutive images of it:
//! `N / R` each, and one more for the first `N mod R` ranks, so that the ranks' shares laid end
//! to end in rank order are the batch one process would have, image for image (each image
//! augmented as one process augments it: the views depend on seed, epoch and dataset index
//! only). Uneven shares are weighted correctly downstream: each rank's loss is scaled by its
//! share (`loss::nt_xent_in`), batch norm sums over the ranks' actual counts.

use std::ops::Range;

use super::DataError;

/// Rank `rank` of `ranks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
}

impl Shard {
    /// The whole batch (one process).
    pub const ALL: Shard = Shard { rank: 0, ranks: 1 };

    /// Positions of this rank's images in a global batch of `batch` images; every rank gets at
    /// least one (a rank without images would have no batch statistics and no loss).
    pub fn range(&self, batch: usize) -> Result<Range<usize>, DataError> {
        if self.ranks == 0 || self.rank >= self.ranks {
            return Err(DataError::Config(vec![format!("rank {} of {} does not exist", self.rank, self.ranks)]));
        }
        if batch < self.ranks {
            return Err(DataError::Config(vec![format!(
                "train.batch_size {batch} is smaller than the {} ranks: every rank needs at least one image of each batch",
                self.ranks
            )]));
        }
        let (base, extra) = (batch / self.ranks, batch % self.ranks);
        let start = self.rank * base + self.rank.min(extra);
        Ok(start..start + base + usize::from(self.rank < extra))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_tile_the_batch_in_rank_order() {
        for (batch, ranks) in [(8, 2), (7, 3), (3, 3), (10, 4), (5, 1)] {
            let ranges: Vec<_> =
                (0..ranks).map(|rank| Shard { rank, ranks }.range(batch).expect("valid shard")).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[ranks - 1].end, batch);
            for w in ranges.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
            assert!(sizes.iter().max().expect("ranks") - sizes.iter().min().expect("ranks") <= 1, "{sizes:?}");
        }
        assert_eq!(Shard { rank: 2, ranks: 3 }.range(7).expect("valid"), 5..7);
    }

    #[test]
    fn a_batch_smaller_than_the_ranks_is_refused() {
        let err = Shard { rank: 0, ranks: 3 }.range(2).expect_err("2 images for 3 ranks");
        assert!(err.to_string().contains("smaller than the 3 ranks"), "{err}");
        assert!(Shard { rank: 3, ranks: 3 }.range(9).is_err());
    }
}
