// run_package PACKAGE INPUTS OUTPUTS: loads an AOTInductor package (.pt2) with
// torch::inductor::AOTIModelPackageLoader and runs it once, without Python.
//
// INPUTS: a list of tensors saved by Python's torch.save (the package's flat inputs, in the order
// of its call spec), read with torch::jit::pickle_load; each is moved to the package's device
// (AOTI_DEVICE_KEY of its metadata). OUTPUTS: the package's flat outputs as CPU
// tensors, a tuple written with torch::jit::pickle_save (Python's torch.load reads it).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw std::runtime_error("cannot open " + path);
  }
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

void write_file(const std::string& path, const std::vector<char>& data) {
  std::ofstream file(path, std::ios::binary);
  file.write(data.data(), static_cast<std::streamsize>(data.size()));
  if (!file) {
    throw std::runtime_error("cannot write " + path);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " PACKAGE INPUTS OUTPUTS\n";
    return 2;
  }
  try {
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    auto metadata = loader.get_metadata();
    const std::string device = metadata.count("AOTI_DEVICE_KEY") ? metadata["AOTI_DEVICE_KEY"] : "cpu";

    const c10::IValue saved = torch::jit::pickle_load(read_file(argv[2]));
    std::vector<at::Tensor> inputs;
    for (const c10::IValue& value : saved.toListRef()) {
      inputs.push_back(value.toTensor().to(c10::Device(device)));
    }
    std::vector<c10::IValue> outputs;
    for (const at::Tensor& output : loader.run(inputs)) {
      outputs.emplace_back(output.cpu());
    }
    // A tuple of tensors: torch.load(..., weights_only=True) reads it.
    std::cout << "ran " << argv[1] << " on " << device << ": " << inputs.size() << " inputs, "
              << outputs.size() << " outputs\n";
    write_file(argv[3], torch::jit::pickle_save(c10::ivalue::Tuple::create(std::move(outputs))));
  } catch (const std::exception& error) {
    std::cerr << "run_package: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
