// The CPU kernels, called through the dispatcher as any client of libtorch would, checked against
// a naive double-precision loop over pairs that follows docs/design.md ("The PDDM unit" for scores, "Mining" for mining) line by
// line. Built and run by CMakeLists.txt (`ctest`); exits non-zero on the first failing check group.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace {

using Vec = std::vector<double>;
using OptTensor = std::optional<at::Tensor>;
using MineOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor>;
using ScoresGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor, at::Tensor>;

int failures = 0;

#define EXPECT(cond, ...)                                                 \
  do {                                                                    \
    if (!(cond)) {                                                        \
      if (++failures <= 30) {                                             \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);       \
        std::printf(__VA_ARGS__);                                         \
        std::printf("\n");                                                \
      }                                                                   \
    }                                                                     \
  } while (0)

// ---------------------------------------------------------------------------------------------
// The naive model: docs/design.md "The PDDM unit" for one pair, in double, with no tiling and no shortcuts.

struct Problem {
  std::string name;
  bool batch;           // y = x
  int64_t m, n, d, h, c;
  Vec x, y;             // (m, d), (n, d) row-major; y == x in batch mode
  Vec W_u, b_u, W_v, b_v, W_c, b_c, w_s;
  double b_s;
  std::vector<int64_t> lx, ly;
  bool normalize_inputs = true;  // docs/design.md "The two forms": false = the distance-aware form
};

Vec normalize(const Vec& z) {
  double sq = 0;
  for (double e : z) sq += e * e;
  const double norm = std::max(std::sqrt(sq), 1e-12);
  Vec out(z.size());
  for (size_t k = 0; k < z.size(); ++k) out[k] = z[k] / norm;
  return out;
}

// relu(W z + b) with W (rows, z.size()) row-major.
Vec linear_relu(const Vec& W, const Vec& b, const Vec& z) {
  Vec out(b.size());
  for (size_t o = 0; o < b.size(); ++o) {
    double acc = b[o];
    for (size_t k = 0; k < z.size(); ++k) acc += W[o * z.size() + k] * z[k];
    out[o] = std::max(acc, 0.0);
  }
  return out;
}

double pddm_pair(const Problem& p, const double* a, const double* b) {
  Vec u(p.d), v(p.d);
  for (int64_t k = 0; k < p.d; ++k) {
    u[k] = std::fabs(a[k] - b[k]);
    v[k] = (a[k] + b[k]) / 2;
  }
  const Vec u1 = normalize(linear_relu(p.W_u, p.b_u, p.normalize_inputs ? normalize(u) : u));
  const Vec v1 = normalize(linear_relu(p.W_v, p.b_v, p.normalize_inputs ? normalize(v) : v));
  Vec joint(u1);
  joint.insert(joint.end(), v1.begin(), v1.end());
  const Vec q = linear_relu(p.W_c, p.b_c, joint);
  double s = p.b_s;
  for (int64_t k = 0; k < p.c; ++k) s += p.w_s[k] * q[k];
  return s;
}

double euclidean_pair(const Problem& p, const double* a, const double* b) {
  double sq = 0;
  for (int64_t k = 0; k < p.d; ++k) sq += (a[k] - b[k]) * (a[k] - b[k]);
  return -sq;
}

using PairFn = std::function<double(const Problem&, const double*, const double*)>;

Vec all_pairs(const Problem& p, const PairFn& score) {
  Vec S(p.m * p.n);
  for (int64_t i = 0; i < p.m; ++i)
    for (int64_t r = 0; r < p.n; ++r) S[i * p.n + r] = score(p, &p.x[i * p.d], &p.y[r * p.d]);
  return S;
}

// ---------------------------------------------------------------------------------------------
// Problems: random data, nn.Linear-style parameters, rounded to the dtype under test so that
// the naive side sees exactly the values the kernel sees.

struct Rng {
  std::mt19937_64 gen;
  explicit Rng(uint64_t seed) : gen(seed) {}
  Vec uniform(int64_t count, double bound) {
    std::uniform_real_distribution<double> dist(-bound, bound);
    Vec v(count);
    for (auto& e : v) e = dist(gen);
    return v;
  }
  int64_t integer(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(gen); }
};

void round_to(Vec& v, at::ScalarType dtype) {
  if (dtype == at::kFloat)
    for (auto& e : v) e = static_cast<double>(static_cast<float>(e));
}

Problem make_problem(std::string name, bool batch, int64_t m, int64_t n, int64_t d, int64_t h, int64_t c,
                     at::ScalarType dtype, uint64_t seed) {
  Rng rng(seed);
  Problem p;
  p.name = std::move(name);
  p.batch = batch;
  p.m = m, p.n = batch ? m : n, p.d = d, p.h = h, p.c = c;
  p.x = rng.uniform(m * d, 1.0);
  p.y = batch ? p.x : rng.uniform(p.n * d, 1.0);
  const double bd = 1 / std::sqrt(double(d)), bj = 1 / std::sqrt(double(2 * h)), bc = 1 / std::sqrt(double(c));
  p.W_u = rng.uniform(h * d, bd), p.b_u = rng.uniform(h, bd);
  p.W_v = rng.uniform(h * d, bd), p.b_v = rng.uniform(h, bd);
  p.W_c = rng.uniform(c * 2 * h, bj), p.b_c = rng.uniform(c, bj);
  p.w_s = rng.uniform(c, bc), p.b_s = rng.uniform(1, bc)[0];
  for (Vec* v : {&p.x, &p.y, &p.W_u, &p.b_u, &p.W_v, &p.b_v, &p.W_c, &p.b_c, &p.w_s}) round_to(*v, dtype);
  if (dtype == at::kFloat) p.b_s = static_cast<double>(static_cast<float>(p.b_s));
  p.lx.assign(m, 0);
  p.ly.assign(p.n, 0);
  return p;
}

at::Tensor tensor(const Vec& v, at::IntArrayRef shape, at::ScalarType dtype) {
  return at::from_blob(const_cast<double*>(v.data()), shape, at::kDouble).clone().to(dtype);
}

at::Tensor labels(const std::vector<int64_t>& l) {
  return at::from_blob(const_cast<int64_t*>(l.data()), {int64_t(l.size())}, at::kLong).clone();
}

struct Args {
  at::Tensor x, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s;
  OptTensor y;
  bool normalize_inputs = true;
};

Args args(const Problem& p, at::ScalarType dtype) {
  Args a;
  a.x = tensor(p.x, {p.m, p.d}, dtype);
  if (!p.batch) a.y = tensor(p.y, {p.n, p.d}, dtype);
  a.W_u = tensor(p.W_u, {p.h, p.d}, dtype), a.b_u = tensor(p.b_u, {p.h}, dtype);
  a.W_v = tensor(p.W_v, {p.h, p.d}, dtype), a.b_v = tensor(p.b_v, {p.h}, dtype);
  a.W_c = tensor(p.W_c, {p.c, 2 * p.h}, dtype), a.b_c = tensor(p.b_c, {p.c}, dtype);
  a.w_s = tensor(p.w_s, {p.c}, dtype), a.b_s = tensor({p.b_s}, {}, dtype);
  a.normalize_inputs = p.normalize_inputs;
  return a;
}

// ---------------------------------------------------------------------------------------------
// The ops, through the dispatcher (the schemas of csrc/pddm_ext.cpp).

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

at::Tensor call_scores(const Args& a) {
  static const auto scores =
      op("pddm_ext::scores")
          .typed<at::Tensor(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, bool, std::optional<at::ScalarType>)>();
  return scores.call(a.x, a.y, a.W_u, a.b_u, a.W_v, a.b_v, a.W_c, a.b_c, a.w_s, a.b_s, a.normalize_inputs,
                     std::nullopt);
}

ScoresGrads call_scores_backward(const at::Tensor& grad, const Args& a) {
  static const auto backward =
      op("pddm_ext::scores_backward")
          .typed<ScoresGrads(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, std::array<bool, 3>, bool,
                             std::optional<at::ScalarType>)>();
  return backward.call(grad, a.x, a.y, a.W_u, a.b_u, a.W_v, a.b_v, a.W_c, a.b_c, a.w_s, a.b_s, {true, true, true},
                       a.normalize_inputs, std::nullopt);
}

MineOut call_mine_pddm(const Problem& p, const Args& a, int64_t k) {
  static const auto mine =
      op("pddm_ext::mine_pddm")
          .typed<MineOut(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool,
                         std::optional<at::ScalarType>)>();
  const OptTensor ly = p.batch ? OptTensor() : OptTensor(labels(p.ly));
  return mine.call(a.x, labels(p.lx), a.y, ly, a.W_u, a.b_u, a.W_v, a.b_v, a.W_c, a.b_c, a.w_s, a.b_s, k, a.normalize_inputs,
                   std::nullopt);
}

MineOut call_mine_euclidean(const Problem& p, const Args& a, int64_t k) {
  static const auto mine =
      op("pddm_ext::mine_euclidean")
          .typed<MineOut(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, int64_t)>();
  const OptTensor ly = p.batch ? OptTensor() : OptTensor(labels(p.ly));
  return mine.call(a.x, labels(p.lx), a.y, ly, k);
}

double value(const at::Tensor& t, int64_t flat) { return t.reshape({-1})[flat].item<double>(); }

std::vector<int64_t> indices(const at::Tensor& t) {
  const auto c = t.contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// ---------------------------------------------------------------------------------------------
// Checks.

bool close(double got, double want, double tol) { return std::fabs(got - want) <= tol * (1 + std::fabs(want)); }

void check_scores(const Problem& p, at::ScalarType dtype, double tol) {
  const Vec want = all_pairs(p, pddm_pair);
  const auto got = call_scores(args(p, dtype));
  const bool shape_ok = got.scalar_type() == dtype && got.dim() == 2 && got.size(0) == p.m && got.size(1) == p.n;
  EXPECT(shape_ok, "%s: scores has the wrong dtype or shape", p.name.c_str());
  if (!shape_ok) return;
  const auto g = got.to(at::kDouble).contiguous();
  const double* gp = g.data_ptr<double>();
  for (int64_t t = 0; t < p.m * p.n; ++t)
    EXPECT(close(gp[t], want[t], tol), "%s: S[%ld, %ld] = %.12g, naive %.12g", p.name.c_str(), long(t / p.n),
          long(t % p.n), gp[t], want[t]);
}

// Gradient of L = sum_{i,r} G[i,r] S[i,r] against central differences of the naive model.
void check_scores_backward(Problem p, double tol) {
  Rng rng(99);
  const Vec G = rng.uniform(p.m * p.n, 1.0);
  const auto grads = call_scores_backward(tensor(G, {p.m, p.n}, at::kDouble), args(p, at::kDouble));
  auto loss = [&]() {
    if (p.batch) p.y = p.x;
    const Vec S = all_pairs(p, pddm_pair);
    double l = 0;
    for (int64_t t = 0; t < p.m * p.n; ++t) l += G[t] * S[t];
    return l;
  };
  auto check_entries = [&](Vec& v, const at::Tensor& got, const char* what) {
    const double eps = 1e-6;
    for (size_t k = 0; k < v.size(); ++k) {
      const double keep = v[k];
      v[k] = keep + eps;
      const double up = loss();
      v[k] = keep - eps;
      const double down = loss();
      v[k] = keep;
      const double want = (up - down) / (2 * eps);
      EXPECT(close(value(got, k), want, tol), "%s: d%s[%zu] = %.10g, finite difference %.10g", p.name.c_str(), what,
            k, value(got, k), want);
    }
  };
  check_entries(p.x, std::get<0>(grads), "x");
  if (!p.batch) check_entries(p.y, std::get<1>(grads), "y");
  check_entries(p.W_u, std::get<2>(grads), "W_u");
  check_entries(p.b_u, std::get<3>(grads), "b_u");
  check_entries(p.W_v, std::get<4>(grads), "W_v");
  check_entries(p.b_v, std::get<5>(grads), "b_v");
  check_entries(p.W_c, std::get<6>(grads), "W_c");
  check_entries(p.b_c, std::get<7>(grads), "b_c");
  check_entries(p.w_s, std::get<8>(grads), "w_s");
  Vec b_s{p.b_s};
  const double eps = 1e-6;
  p.b_s = b_s[0] + eps;
  const double up = loss();
  p.b_s = b_s[0] - eps;
  const double down = loss();
  p.b_s = b_s[0];
  EXPECT(close(value(std::get<9>(grads), 0), (up - down) / (2 * eps), tol), "%s: db_s", p.name.c_str());
}

// docs/design.md "Ties and tolerance" by brute force over S, then the kernel's answer slot by slot: a mined index must be a
// valid candidate whose naive score is within tol of the naive optimum (exact == true: the very
// index the tie rule picks, for inputs whose scores are computed exactly).
void check_mining(const Problem& p, const Vec& S, const MineOut& got, int64_t k, double tol, bool exact) {
  const char* name = p.name.c_str();
  // Reference mode leaves out the same-label pairs of equal rows (docs/design.md#mining, the self-copy rule).
  auto equal_rows = [&](int64_t i, int64_t r) {
    for (int64_t t = 0; t < p.d; ++t)
      if (p.x[i * p.d + t] != p.y[r * p.d + t]) return false;
    return true;
  };
  auto positive = [&](int64_t i, int64_t r) {
    return (!p.batch || i != r) && p.lx[i] == p.ly[r] && (p.batch || !equal_rows(i, r));
  };
  auto negative = [&](int64_t i, int64_t r) { return p.lx[i] != p.ly[r]; };

  // One slot: `best` over candidates `ok` (max or min), ties to the smallest index.
  auto check_slot = [&](const char* what, int64_t slot, int64_t count, int64_t got_idx, double got_s,
                        const std::function<bool(int64_t)>& ok, const std::function<double(int64_t)>& s,
                        bool maximise) {
    int64_t best = -1;
    for (int64_t j = 0; j < count; ++j)
      if (ok(j) && (best < 0 || (maximise ? s(j) > s(best) : s(j) < s(best)))) best = j;
    if (best < 0) {
      EXPECT(got_idx == -1, "%s: %s[%ld] = %ld, want -1 (no candidate)", name, what, long(slot), long(got_idx));
      return;
    }
    EXPECT(got_idx >= 0 && got_idx < count && ok(got_idx), "%s: %s[%ld] = %ld is not a candidate", name, what,
          long(slot), long(got_idx));
    if (!(got_idx >= 0 && got_idx < count && ok(got_idx))) return;
    if (exact) {
      EXPECT(got_idx == best, "%s: %s[%ld] = %ld, tie rule wants %ld", name, what, long(slot), long(got_idx),
            long(best));
    } else {
      EXPECT(close(s(got_idx), s(best), tol), "%s: %s[%ld] = %ld scores %.10g, best %ld scores %.10g", name, what,
            long(slot), long(got_idx), s(got_idx), long(best), s(best));
    }
    EXPECT(close(got_s, s(got_idx), tol), "%s: %s[%ld]: returned score %.10g, naive %.10g", name, what, long(slot),
          got_s, s(got_idx));
  };

  const auto pos_i = indices(std::get<0>(got)), neg_i = indices(std::get<2>(got)), col_i = indices(std::get<4>(got));
  const bool lengths_ok =
      int64_t(pos_i.size()) == p.m && int64_t(neg_i.size()) == p.m && int64_t(col_i.size()) == p.n;
  EXPECT(lengths_ok, "%s: per-row outputs have the wrong length", name);
  if (!lengths_ok) return;
  for (int64_t i = 0; i < p.m; ++i) {
    check_slot("hardest_positive", i, p.n, pos_i[i], pos_i[i] >= 0 ? value(std::get<1>(got), i) : 0,
               [&](int64_t r) { return positive(i, r); }, [&](int64_t r) { return S[i * p.n + r]; }, false);
    check_slot("hardest_negative", i, p.n, neg_i[i], neg_i[i] >= 0 ? value(std::get<3>(got), i) : 0,
               [&](int64_t r) { return negative(i, r); }, [&](int64_t r) { return S[i * p.n + r]; }, true);
  }
  for (int64_t r = 0; r < p.n; ++r)
    check_slot("hardest_negative_of_ref", r, p.m, col_i[r], col_i[r] >= 0 ? value(std::get<5>(got), r) : 0,
               [&](int64_t i) { return negative(i, r); }, [&](int64_t i) { return S[i * p.n + r]; }, true);

  // The k lowest positive pairs, ordered by (S, i, r); batch mode counts {i, r} once, as i < r.
  struct Pair {
    double s;
    int64_t i, r;
  };
  std::vector<Pair> want;
  for (int64_t i = 0; i < p.m; ++i)
    for (int64_t r = p.batch ? i + 1 : 0; r < p.n; ++r)
      if (positive(i, r)) want.push_back({S[i * p.n + r], i, r});
  std::sort(want.begin(), want.end(), [](const Pair& a, const Pair& b) {
    return a.s != b.s ? a.s < b.s : (a.i != b.i ? a.i < b.i : a.r < b.r);
  });
  if (k >= 0 && int64_t(want.size()) > k) want.resize(k);
  const auto pi = indices(std::get<6>(got)), pr = indices(std::get<7>(got));
  EXPECT(pi.size() == want.size() && pr.size() == want.size(), "%s (k=%ld): %zu pairs, want %zu", name, long(k),
        pi.size(), want.size());
  if (pi.size() != want.size()) return;
  std::vector<std::pair<int64_t, int64_t>> seen;
  for (size_t q = 0; q < want.size(); ++q) {
    const bool valid = pi[q] >= 0 && pi[q] < p.m && pr[q] >= 0 && pr[q] < p.n && positive(pi[q], pr[q]) &&
                       (!p.batch || pi[q] < pr[q]);
    EXPECT(valid, "%s (k=%ld): pair %zu = (%ld, %ld) is not a positive pair", name, long(k), q, long(pi[q]),
          long(pr[q]));
    if (!valid) continue;
    seen.emplace_back(pi[q], pr[q]);
    const double s = S[pi[q] * p.n + pr[q]];
    if (exact) {
      EXPECT(pi[q] == want[q].i && pr[q] == want[q].r, "%s (k=%ld): pair %zu = (%ld, %ld), want (%ld, %ld)", name,
            long(k), q, long(pi[q]), long(pr[q]), long(want[q].i), long(want[q].r));
    } else {
      EXPECT(close(s, want[q].s, tol), "%s (k=%ld): pair %zu scores %.10g, want %.10g", name, long(k), q, s,
            want[q].s);
    }
    EXPECT(close(value(std::get<8>(got), q), s, tol), "%s (k=%ld): pair %zu returned score %.10g, naive %.10g",
          name, long(k), q, value(std::get<8>(got), q), s);
  }
  std::sort(seen.begin(), seen.end());
  EXPECT(std::adjacent_find(seen.begin(), seen.end()) == seen.end(), "%s (k=%ld): a pair is returned twice", name,
        long(k));
}

// Label layouts of the mining tests.
enum class Layout { distinct, one_class, two_per_class, unbalanced };

void set_labels(Problem& p, Layout layout, uint64_t seed) {
  Rng rng(seed);
  auto fill = [&](std::vector<int64_t>& l) {
    for (size_t t = 0; t < l.size(); ++t) {
      switch (layout) {
        case Layout::distinct: l[t] = int64_t(t) + (&l == &p.ly ? 1000 : 0); break;
        case Layout::one_class: l[t] = 7; break;
        case Layout::two_per_class: l[t] = int64_t(t) / 2; break;
        case Layout::unbalanced: l[t] = rng.integer(0, 9) < 7 ? 0 : rng.integer(1, 3); break;
      }
    }
  };
  fill(p.lx);
  if (p.batch) {
    p.ly = p.lx;
  } else {
    fill(p.ly);
  }
}

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::distinct: return "distinct";
    case Layout::one_class: return "one_class";
    case Layout::two_per_class: return "two_per_class";
    case Layout::unbalanced: return "unbalanced";
  }
  return "?";
}

const char* dtype_name(at::ScalarType t) { return t == at::kFloat ? "float32" : "float64"; }

int report(const char* group, int before) {
  std::printf("%-40s %s\n", group, failures == before ? "ok" : "FAILED");
  return failures;
}

}  // namespace

// The check groups, run once per instruction-set level by main.
void check_all_groups() {
  struct Shape {
    bool batch;
    int64_t m, n, d, h, c;
  };
  // Edge sizes (m = 1, 2, d = 1), h != c, m != n, and sizes that are not multiples of the CPU
  // tiles (at most 32 x 32 pairs for these widths; 128 x 128 for the Euclidean Gram tiles).
  const std::vector<Shape> shapes = {
      {true, 1, 1, 4, 3, 2},   {true, 2, 2, 1, 4, 4},     {true, 37, 37, 5, 7, 3},  {true, 70, 70, 16, 8, 12},
      {false, 1, 5, 3, 6, 2},  {false, 3, 1, 1, 4, 4},    {false, 13, 70, 16, 8, 12},
      {false, 45, 33, 9, 20, 5}, {true, 131, 131, 130, 40, 24},
  };

  int before = failures;
  for (auto dtype : {at::kDouble, at::kFloat}) {
    const double tol = dtype == at::kDouble ? 1e-10 : 1e-4;
    uint64_t seed = 1;
    for (const auto& s : shapes) {
      const std::string name = std::string("scores ") + (s.batch ? "batch" : "ref") + " m=" + std::to_string(s.m) +
                               " n=" + std::to_string(s.n) + " d=" + std::to_string(s.d) + " " + dtype_name(dtype);
      check_scores(make_problem(name, s.batch, s.m, s.n, s.d, s.h, s.c, dtype, seed++), dtype, tol);
    }
  }
  report("scores vs naive loop", before);

  before = failures;
  check_scores_backward(make_problem("backward batch", true, 5, 5, 3, 4, 2, at::kDouble, 11), 1e-6);
  check_scores_backward(make_problem("backward ref", false, 4, 3, 3, 5, 2, at::kDouble, 12), 1e-6);
  report("scores_backward vs finite differences", before);

  // The distance-aware form: scores, gradients and mining with the per-pair input scales dropped.
  before = failures;
  for (auto dtype : {at::kDouble, at::kFloat}) {
    const double tol = dtype == at::kDouble ? 1e-10 : 1e-4;
    for (const auto& s : {Shape{true, 2, 2, 1, 3, 2}, Shape{true, 37, 37, 5, 7, 3}, Shape{false, 13, 70, 16, 8, 12}}) {
      Problem p = make_problem(std::string("distance-aware ") + (s.batch ? "batch" : "ref") + " m=" + std::to_string(s.m) +
                                   " " + dtype_name(dtype),
                               s.batch, s.m, s.n, s.d, s.h, s.c, dtype, 31);
      p.normalize_inputs = false;
      check_scores(p, dtype, tol);
      set_labels(p, Layout::unbalanced, 32);
      const Vec S = all_pairs(p, pddm_pair);
      for (int64_t k : {int64_t(1), int64_t(-1)})
        check_mining(p, S, call_mine_pddm(p, args(p, dtype), k), k, dtype == at::kDouble ? 1e-9 : 1e-4, false);
    }
  }
  for (bool batch : {true, false}) {
    Problem p = make_problem(std::string("distance-aware backward ") + (batch ? "batch" : "ref"), batch, 5, 4, 3, 4, 2,
                             at::kDouble, 33);
    p.normalize_inputs = false;
    check_scores_backward(p, 1e-6);
  }
  report("distance-aware form (normalize_inputs=false)", before);

  before = failures;
  const std::vector<Shape> mining_shapes = {
      {true, 2, 2, 3, 4, 4}, {true, 40, 40, 6, 8, 5}, {false, 17, 45, 6, 8, 5}, {false, 1, 9, 4, 4, 3},
  };
  for (auto dtype : {at::kDouble, at::kFloat}) {
    const double tol = dtype == at::kDouble ? 1e-9 : 1e-4;
    uint64_t seed = 100;
    for (const auto& s : mining_shapes) {
      for (auto layout : {Layout::distinct, Layout::one_class, Layout::two_per_class, Layout::unbalanced}) {
        const std::string base = std::string(s.batch ? "batch" : "ref") + " m=" + std::to_string(s.m) +
                                 " n=" + std::to_string(s.n) + " " + layout_name(layout) + " " + dtype_name(dtype);
        Problem p = make_problem("mine_pddm " + base, s.batch, s.m, s.n, s.d, s.h, s.c, dtype, seed++);
        set_labels(p, layout, seed);
        const Args a = args(p, dtype);
        const Vec S = all_pairs(p, pddm_pair);
        for (int64_t k : {int64_t(1), int64_t(3), int64_t(-1)}) check_mining(p, S, call_mine_pddm(p, a, k), k, tol, false);

        p.name = "mine_euclidean " + base;
        const Vec E = all_pairs(p, euclidean_pair);
        for (int64_t k : {int64_t(1), int64_t(3), int64_t(-1)})
          check_mining(p, E, call_mine_euclidean(p, a, k), k, tol, false);
      }
    }
  }
  report("mining vs brute force", before);

  // Integer coordinates make every Euclidean score exact in both dtypes, with many exact ties:
  // the tie rule (smallest index; pairs by (S, i, r)) must then hold exactly, across Gram tiles.
  before = failures;
  for (auto dtype : {at::kDouble, at::kFloat}) {
    for (const Shape& s : {Shape{true, 300, 300, 3, 1, 1}, Shape{false, 150, 260, 2, 1, 1}}) {
      Problem p = make_problem(std::string("ties ") + (s.batch ? "batch " : "ref ") + dtype_name(dtype), s.batch, s.m,
                               s.n, s.d, s.h, s.c, dtype, 7);
      Rng rng(8);
      for (auto& e : p.x) e = double(rng.integer(0, 2));
      if (s.batch) {
        p.y = p.x;
      } else {
        for (auto& e : p.y) e = double(rng.integer(0, 2));
      }
      set_labels(p, Layout::unbalanced, 9);
      const Args a = args(p, dtype);
      const Vec E = all_pairs(p, euclidean_pair);
      for (int64_t k : {int64_t(1), int64_t(5), int64_t(-1)}) check_mining(p, E, call_mine_euclidean(p, a, k), k, 0, true);
    }
  }
  report("exact ties (Euclidean, integer inputs)", before);

}

int main() {
  for (const char* name : {"pddm_ext::scores", "pddm_ext::scores_backward", "pddm_ext::mine_pddm",
                           "pddm_ext::mine_euclidean"}) {
    const auto schema = c10::Dispatcher::singleton().findSchema({name, ""});
    if (!schema.has_value() || !schema->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
      std::printf("FAIL: %s has no CPU kernel registered (is libpddm_ext linked?)\n", name);
      return 1;
    }
  }

  // Every check group under each instruction-set level this CPU has (PDDM_EXT_CPU_ISA, read by
  // every op): the baseline, AVX2 and AVX-512 builds of the loops must each agree with the naive loop.
  const auto levels = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("pddm_ext::cpu_isa", "")
                          .typed<std::vector<std::string>()>()
                          .call();
  for (size_t l = 1; l < levels.size(); ++l) {
    std::printf("== PDDM_EXT_CPU_ISA=%s\n", levels[l].c_str());
    setenv("PDDM_EXT_CPU_ISA", levels[l].c_str(), 1);
    check_all_groups();
  }
  unsetenv("PDDM_EXT_CPU_ISA");

  std::printf(failures ? "%d check(s) failed\n" : "all checks passed\n", failures);
  return failures ? 1 : 0;
}
