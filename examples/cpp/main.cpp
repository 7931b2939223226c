// Trains a tiny attention model with fusedattn's C++ module and saves it: the whole C++ API
// comes from one include, and the op is found through the dispatcher like any torch op.
#include <fusedattn/fusedattn.h>
#include <torch/torch.h>

#include <iostream>

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
  return (last < first && same) ? 0 : 1;
}
