// Loads the model that export.py wrote, as an AOTInductor package and as TorchScript, runs
// each on the cases in io.pt (sizes the export never saw) and compares with Python's
// outputs. The graphs name fusedattn's ops; linking fusedattn::fusedattn (through the
// header's link anchor) registers them, nothing else is needed. Exits 1 on a mismatch.
#include <fusedattn/fusedattn.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <filesystem>
#include <iostream>
#include <map>
#include <string>
#include <vector>

namespace {

std::map<std::string, torch::Tensor> load_tensors(const std::string& path) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& b : torch::jit::load(path).named_buffers()) out[b.name] = b.value;
  return out;
}

// Max |a - b|; NaN or a shape mismatch is a failure of its own.
double max_error(const torch::Tensor& got, const torch::Tensor& want) {
  if (got.sizes() != want.sizes()) return std::numeric_limits<double>::infinity();
  return (got.to(torch::kDouble) - want.to(torch::kDouble)).abs().max().item<double>();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " EXPORT_DIR (written by export.py)\n";
    return 2;
  }
  const std::string dir = argv[1];
  auto io = load_tensors(dir + "/io.pt");
  torch::NoGradGuard no_grad;

  std::map<std::string, std::function<std::vector<torch::Tensor>(std::vector<torch::Tensor>)>> runners;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> aoti;
  if (std::filesystem::exists(dir + "/model.pt2")) {
    aoti = std::make_unique<torch::inductor::AOTIModelPackageLoader>(dir + "/model.pt2");
    runners["aoti"] = [&](std::vector<torch::Tensor> in) { return aoti->run(in); };
  }
  for (const char* kind : {"script", "trace"}) {
    auto module = std::make_shared<torch::jit::Module>(
        torch::jit::load(dir + "/model_" + kind + ".pt"));
    module->eval();
    runners[kind] = [module](std::vector<torch::Tensor> in) {
      auto out = module->forward({in[0], in[1], in[2]}).toTuple();
      return std::vector<torch::Tensor>{out->elements()[0].toTensor(), out->elements()[1].toTensor()};
    };
  }

  bool ok = true;
  for (int c = 0; io.count("case" + std::to_string(c) + "_src"); ++c) {
    const std::string p = "case" + std::to_string(c) + "_";
    std::vector<torch::Tensor> in{io[p + "src"], io[p + "src_pad"], io[p + "tgt"]};
    for (auto& [kind, run] : runners) {
      auto out = run(in);
      const double e_logits = max_error(out.at(0), io[p + "logits"]);
      const double e_weights = max_error(out.at(1), io[p + "weights"]);
      const bool pass = e_logits < 1e-4 && e_weights < 1e-5;
      ok = ok && pass;
      std::cout << kind << " case " << c << " " << in[0].sizes() << " x " << in[2].sizes()
                << ": max error logits " << e_logits << ", weights " << e_weights
                << (pass ? " ok" : " MISMATCH") << "\n";
    }
  }
  std::cout << (ok ? "all outputs match Python" : "outputs differ from Python") << "\n";
  return ok ? 0 : 1;
}
