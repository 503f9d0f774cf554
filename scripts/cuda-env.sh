# Sourced by the GPU scripts: where the driver and NVRTC libraries live on the GPU machine.

# Directories that may hold libcuda / libnvrtc on the GPU machine.
library_path() {
    local dirs=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64
        /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu)
    local py
    py=$(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in os.listdir(p)))' 2>/dev/null)
    local path=""
    for d in "${dirs[@]}" $py; do
        [ -d "$d" ] && path="$path${path:+:}$d"
    done
    echo "$path"
}

