"""A from-scratch isolation forest (Liu, Ting and Zhou, ICDM 2008) in numpy, for FedDetect.

Copy this file alone: it depends on numpy only and holds no globals.

    from isoforest import IsolationForest
    flags = IsolationForest(seed=0).fit_predict([0.71, 0.69, 0.70, 1.93])   # -> [ 1  1  1 -1]

The algorithm, as the paper defines it:
  * each tree sees psi = min(256, n) points drawn without replacement;
  * a node splits on a random feature at a value drawn uniformly between that feature's min and max
    in the node, until the node holds one point, its points are all equal, or the depth reaches
    ceil(log2 psi);
  * the path length of x in a tree is h(x) = edges from the root + c(size of the leaf it lands in),
    where c(n) = 2 H(n-1) - 2 (n-1) / n is the mean path length of an unsuccessful search in a
    binary search tree of n points (H(i) = ln i + Euler's constant; c(2) = 1, c(n < 2) = 0);
  * the anomaly score is s(x) = 2 ** (-E[h(x)] / c(psi)): near 1 is anomalous, 0.5 or below is not.

Speed: trees are grown level by level for all trees at once (no per-node Python recursion) and
points are pushed down all trees together, one numpy step per level.

Know its limit before you trust it: the forest is scale-free. A split is drawn between the min and
the max of whatever it is given, so among four numbers that differ only by noise one is still
isolated early and scores above 0.5. Gate its outliers with a notion of scale when false alarms cost
something (fedgan.py's `feddetect_calibrated` does).
"""
import math

import numpy as np

def average_path_length(n):
    """c(n): mean path length of an unsuccessful BST search among n points (array or scalar)."""
    n = np.asarray(n, dtype=np.float64)
    safe = np.maximum(n, 2.0)  # keeps log() finite where the result is overwritten below
    c = 2.0 * (np.log(safe - 1.0) + 0.5772156649) - 2.0 * (safe - 1.0) / safe  # 0.577...: Euler's gamma
    c = np.where(n == 2, 1.0, c)
    return np.where(n < 2, 0.0, c)


def _as_2d(X):
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"isolation forest needs a non-empty (n,) or (n, d) array, got shape {X.shape}")
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise ValueError(f"isolation forest input has NaN or inf in rows {np.flatnonzero(bad).tolist()}; "
                         "drop or impute those rows first")
    return X


class IsolationForest:
    """Isolation forest with scikit-learn's method names and signs.

    n_estimators: number of trees. max_samples: "auto" (min(256, n)), an int, or a float fraction of n.
    contamination: "auto" flags s(x) > 0.5 (the original paper's rule); a float in (0, 0.5] flags that
    fraction of the training points (the score threshold is the training scores' quantile).
    As in scikit-learn, score_samples is -s(x) (lower is more abnormal), offset_ is the threshold on it
    (-0.5 for "auto"), decision_function = score_samples - offset_ (negative: outlier), and predict and
    fit_predict give -1 for outliers and +1 for inliers; anomaly_score is the paper's s(x) itself.
    seed: makes the forest, and so every result, deterministic.
    """

    def __init__(self, n_estimators=100, max_samples="auto", contamination="auto", seed=None):
        if contamination != "auto" and not (0.0 < float(contamination) <= 0.5):
            raise ValueError(f"contamination must be 'auto' or in (0, 0.5], got {contamination!r}")
        self.n_estimators = int(n_estimators)
        self.max_samples = max_samples
        self.contamination = contamination
        self.seed = seed

    # -- fitting ---------------------------------------------------------------------------------
    def _sample_size(self, n):
        if self.max_samples == "auto":
            return min(256, n)
        if isinstance(self.max_samples, float):
            return max(1, min(n, int(self.max_samples * n)))
        return max(1, min(n, int(self.max_samples)))

    def fit(self, X):
        X = _as_2d(X)
        n, d = X.shape
        rng = np.random.default_rng(self.seed)
        T, psi = self.n_estimators, self._sample_size(n)
        self.psi_ = psi
        self.height_limit_ = math.ceil(math.log2(psi)) if psi > 1 else 0

        # A tree of height L has at most 2^(L+1) - 1 nodes: preallocate them all (51,100 for the default).
        cap = T * (2 ** (self.height_limit_ + 1) - 1)
        self.feature_ = np.full(cap, -1)      # -1 marks a leaf
        self.threshold_ = np.zeros(cap)
        self.left_ = np.full(cap, -1)
        self.right_ = np.full(cap, -1)
        self.size_ = np.zeros(cap, dtype=np.int64)
        self.size_[:T] = psi

        # Every (tree, sampled point) pair is one entry; entries carry the id of the node they sit in.
        rows = np.argsort(rng.random((T, n)), axis=1)[:, :psi].reshape(-1)  # sampling w/o replacement
        vals = X[rows]                                                     # (E, d), E = T * psi
        node_of = np.repeat(np.arange(T), psi)                             # roots are nodes 0..T-1
        level, n_nodes = np.arange(T), T

        for _ in range(self.height_limit_):
            # Per-node, per-feature range of the points of each node on this level.
            local = np.searchsorted(level, node_of)          # entry -> position of its node in `level`
            lo = np.full((len(level), d), np.inf)
            hi = np.full((len(level), d), -np.inf)
            np.minimum.at(lo, local, vals)
            np.maximum.at(hi, local, vals)
            varies = hi > lo                                 # (nodes, d): features worth splitting on
            split = varies.any(axis=1) & (self.size_[level] > 1)
            if not split.any():
                break
            # A random non-constant feature, and a split value uniform inside its range.
            q = np.argmax(rng.random(varies.shape) * varies, axis=1)
            at = np.arange(len(level))
            p = lo[at, q] + rng.random(len(level)) * (hi[at, q] - lo[at, q])

            parents = level[split]
            first_child = np.full(len(level), -1)
            first_child[split] = n_nodes + 2 * np.arange(len(parents))
            self.feature_[parents], self.threshold_[parents] = q[split], p[split]
            self.left_[parents], self.right_[parents] = first_child[split], first_child[split] + 1

            # Entries of split nodes move to a child (left when below the split); the rest are done.
            moving = split[local]
            go_right = vals[np.arange(len(vals)), q[local]] >= p[local]
            vals, node_of = vals[moving], (first_child[local] + go_right)[moving]
            level = np.arange(n_nodes, n_nodes + 2 * len(parents))
            self.size_[level] = np.bincount(node_of - n_nodes, minlength=len(level))
            n_nodes += len(level)

        self.roots_, self.n_features_ = np.arange(T), d
        self.offset_ = -0.5 if self.contamination == "auto" else \
            float(np.quantile(self.score_samples(X), float(self.contamination)))  # the training points' quantile
        return self

    # -- scoring ---------------------------------------------------------------------------------
    def path_lengths(self, X, chunk=8192):
        """E[h(x)] over the trees, shape (n,)."""
        X = _as_2d(X)
        if X.shape[1] != self.n_features_:
            raise ValueError(f"fitted on {self.n_features_} features, got {X.shape[1]}")
        out = np.empty(len(X))
        for start in range(0, len(X), chunk):  # bounds memory at T * chunk entries
            Xc = X[start:start + chunk]
            cols = np.arange(len(Xc))[None, :]
            node = np.repeat(self.roots_[:, None], len(Xc), axis=1)  # (T, m)
            depth = np.zeros(node.shape)
            for _ in range(self.height_limit_):
                inner = self.left_[node] >= 0
                if not inner.any():
                    break
                f = np.maximum(self.feature_[node], 0)
                go_left = Xc[cols, f] < self.threshold_[node]
                nxt = np.where(go_left, self.left_[node], self.right_[node])
                node = np.where(inner, nxt, node)
                depth += inner
            h = depth + average_path_length(self.size_[node])
            out[start:start + chunk] = h.mean(axis=0)
        return out

    def anomaly_score(self, X):
        """The paper's anomaly score s(x) = 2^(-E[h(x)] / c(psi)) in (0, 1]; higher is more anomalous."""
        c = float(average_path_length(self.psi_))
        if c == 0.0:  # a forest of one point isolates nothing: everybody is neutral
            return np.full(len(_as_2d(X)), 0.5)
        return np.exp2(-self.path_lengths(X) / c)

    def score_samples(self, X):
        """scikit-learn's score: -s(x), in [-1, 0); lower is more abnormal."""
        return -self.anomaly_score(X)

    def decision_function(self, X):
        """score_samples - offset_: negative for outliers, positive for inliers."""
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """+1 for inliers, -1 for outliers."""
        # The tolerance absorbs rounding in the mean over trees: points no tree can split (all equal)
        # score 2^-1 up to ~1e-16 and must not be flagged by it.
        return np.where(self.decision_function(X) < -1e-9, -1, 1)

    def fit_predict(self, X):
        return self.fit(X).predict(X)



if __name__ == "__main__":
    # Benchmark and calibration figures: python isoforest.py [draws]
    import sys
    import time

    draws = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    rng = np.random.default_rng(0)
    print("fit + score, 100 trees, one core of numpy:")
    for n in (4, 100, 1000):
        x = rng.standard_normal(n)
        reps = 20 if n < 1000 else 5
        t = time.perf_counter()
        for _ in range(reps):
            IsolationForest(seed=1).fit(x).score_samples(x)
        print(f"  n = {n:5d}: {(time.perf_counter() - t) / reps * 1000:7.2f} ms")
    print(f"contamination='auto' on N i.i.d. Gaussian values ({draws} draws each):")
    for n in (4, 8, 16, 32):
        flagged, exactly_one, acted = 0, 0, 0
        for s in range(draws):
            k = int((IsolationForest(seed=s).fit_predict(rng.standard_normal(n)) == -1).sum())
            flagged += k
            exactly_one += k == 1
            acted += k if 0 < k < n / 2 else 0  # FedDetect decays weights only when 0 < |O| < N/2
        print(f"  N = {n:2d}: outliers {flagged / (draws * n):.3f} per client-draw; FedDetect's false alarms "
              f"(0 < |O| < N/2) {acted / (draws * n):.3f} per client-round; exactly one in {exactly_one / draws:.3f}")
