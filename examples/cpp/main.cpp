// Trains two small models with fusedattn's C++ modules (MultiheadAttention; LSTM +
// SelfAttention + AttentionPooling) and saves them with torch::save: the whole C++ API
// comes from one include, and the op is found through the dispatcher like any torch op.
#include <fusedattn/fusedattn.h>
#include <torch/torch.h>

#include <iostream>

// The single-head layers in one model: LSTM -> SelfAttention -> AttentionPooling -> Linear.
struct MarkerRegressorImpl : torch::nn::Module {
  MarkerRegressorImpl()
      : lstm(register_module("lstm", torch::nn::LSTM(torch::nn::LSTMOptions(2, 32).batch_first(true)))),
        self_attn(register_module("self_attn", fusedattn::SelfAttention(32, 32))),
        pool(register_module("pool", fusedattn::AttentionPooling(
                                         fusedattn::AttentionPoolingOptions(32).units(16)))),
        out(register_module("out", torch::nn::Linear(16, 1))) {}

  // x (N, T, 2), pad (N, T) bool True = padding -> (N, 1)
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& pad) {
    auto h = std::get<0>(lstm->forward(x));
    h = h + std::get<0>(self_attn->forward(h, pad, /*is_causal=*/false, /*need_weights=*/false));
    return out->forward(std::get<0>(pool->forward(h, pad)));
  }

  torch::nn::LSTM lstm;
  fusedattn::SelfAttention self_attn;
  fusedattn::AttentionPooling pool;
  torch::nn::Linear out;
};
TORCH_MODULE(MarkerRegressor);

// Sequences of (value, marker) with one marked valid step; the target is the marked value.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> marker_batch(int64_t n, int64_t T) {
  auto lengths = torch::randint(4, T + 1, {n});
  auto pad = torch::arange(T).unsqueeze(0) >= lengths.unsqueeze(1);
  auto values = torch::randn({n, T});
  auto where = (torch::rand({n}) * lengths).to(torch::kLong);
  auto marker = torch::zeros({n, T}).scatter_(1, where.unsqueeze(1), 1.0);
  auto x = torch::stack({values, marker}, -1).masked_fill(pad.unsqueeze(-1), 0.0);
  return {x, pad, values.gather(1, where.unsqueeze(1))};
}

int train_seed_layers() {
  torch::manual_seed(1);
  MarkerRegressor model;
  torch::optim::Adam opt(model->parameters(), 3e-3);
  double first = 0, last = 0;
  for (int step = 0; step < 300; ++step) {
    auto [x, pad, y] = marker_batch(64, 12);
    auto loss = torch::l1_loss(model->forward(x, pad), y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    if (step == 0) first = loss.item<double>();
    last = loss.item<double>();
  }
  model->eval();
  torch::NoGradGuard no_grad;
  auto [x, pad, y] = marker_batch(500, 12);
  const double mae = torch::l1_loss(model->forward(x, pad), y).item<double>();
  const double baseline = (y - y.mean()).abs().mean().item<double>();
  std::cout << "single-head layers: train MAE " << first << " -> " << last << ", test MAE " << mae
            << " (predicting the mean: " << baseline << ")\n";

  torch::save(model, "fusedattn_app_regressor.pt");
  MarkerRegressor loaded;
  torch::load(loaded, "fusedattn_app_regressor.pt");
  loaded->eval();
  const bool same = torch::equal(loaded->forward(x, pad), model->forward(x, pad));
  std::cout << "regressor save/load round trip " << (same ? "ok" : "MISMATCH") << "\n";
  return (mae < 0.5 * baseline && same) ? 0 : 1;
}

int main() {
  torch::manual_seed(0);
  const int64_t E = 16, H = 4, L = 6, N = 8;
  fusedattn::MultiheadAttention attn(fusedattn::MultiheadAttentionOptions(E, H).batch_first(true));
  torch::nn::Linear head(E, 1);
  std::vector<torch::Tensor> params = attn->parameters();
  for (auto& p : head->parameters()) params.push_back(p);
  torch::optim::Adam opt(params, 1e-2);

  // Task: predict the mean of the first feature over the sequence.
  auto x = torch::randn({N, L, E});
  auto y = x.select(-1, 0).mean(1, true);
  double first = 0, last = 0;
  for (int step = 0; step < 100; ++step) {
    auto [out, weights] = attn->forward(x, x, x, /*key_padding_mask=*/{}, /*need_weights=*/false);
    auto loss = torch::mse_loss(head->forward(out.mean(1)), y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    if (step == 0) first = loss.item<double>();
    last = loss.item<double>();
  }
  std::cout << "loss " << first << " -> " << last << "\n";

  // The op by name, as a C++ app that never includes the module header would reach it.
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fusedattn::attention", "");
  std::cout << "found op " << op.schema().name() << "\n";
  auto q = torch::randn({1, 2, 3, 8});
  auto r = fusedattn::attention(q, q, q, fusedattn::AttentionOptions().is_causal(true).return_weights(true));
  std::cout << "weights row sums " << r.weights->sum(-1).flatten() << "\n";

  torch::save(attn, "fusedattn_app_mha.pt");
  fusedattn::MultiheadAttention loaded(fusedattn::MultiheadAttentionOptions(E, H).batch_first(true));
  torch::load(loaded, "fusedattn_app_mha.pt");
  auto same = torch::equal(std::get<0>(loaded->forward(x, x, x)), std::get<0>(attn->forward(x, x, x)));
  std::cout << "save/load round trip " << (same ? "ok" : "MISMATCH") << "\n";
  if (!(last < first && same)) return 1;
  return train_seed_layers();
}
