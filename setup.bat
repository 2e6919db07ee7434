@echo off
rem Image similarity search: setup menu and non-interactive subcommands (Windows).
rem   setup.bat                 interactive menu
rem   setup.bat all [N]         install, init-db, populate N CIFAR-10 images, index, serve
rem   setup.bat install ^| init-db ^| populate [N] ^| build-index ^| admin-key ^| serve ^| worker ^| test ^| status
setlocal enableextensions
cd /d "%~dp0"
if "%VENV%"=="" set "VENV=.venv"
set "PY=%VENV%\Scripts\python.exe"
if "%NUM_IMAGES%"=="" set "NUM_IMAGES=2000"

set "CMD=%~1"
if "%CMD%"=="" goto menu
if /i "%CMD%"=="install" (call :install & goto end)
if /i "%CMD%"=="init-db" (call :init_db & goto end)
if /i "%CMD%"=="populate" (call :populate %2 & goto end)
if /i "%CMD%"=="build-index" (call :build_index & goto end)
if /i "%CMD%"=="serve" (call :serve & goto end)
if /i "%CMD%"=="test" (call :run_tests & goto end)
if /i "%CMD%"=="status" (call :cli status & goto end)
if /i "%CMD%"=="admin-key" (call :admin_key & goto end)
if /i "%CMD%"=="worker" (call :cli worker & goto end)
if /i "%CMD%"=="all" (call :all %2 & goto end)
echo unknown command: %CMD%
exit /b 2

:menu
echo.
echo Image similarity search - setup
echo   1) Install dependencies
echo   2) Set up the database
echo   3) Populate with CIFAR-10
echo   4) Build prototypes and index
echo   5) Start the server
echo   6) Run the tests
echo   7) Everything (1-5)
echo   8) Status
echo   9) Create or show the admin API key
echo   w) Start a catalogue-job worker (more workers ingest faster)
echo   q) Quit
set "CHOICE="
set /p CHOICE=Choice: 
if "%CHOICE%"=="1" call :install
if "%CHOICE%"=="2" call :init_db
if "%CHOICE%"=="3" (set "N=" & set /p N=How many images? [%NUM_IMAGES%] & call :populate %%N%%)
if "%CHOICE%"=="4" call :build_index
if "%CHOICE%"=="5" call :serve
if "%CHOICE%"=="6" call :run_tests
if "%CHOICE%"=="7" (set "N=" & set /p N=How many images? [%NUM_IMAGES%] & call :all %%N%%)
if "%CHOICE%"=="8" call :cli status
if "%CHOICE%"=="9" call :admin_key
if /i "%CHOICE%"=="w" call :cli worker
if /i "%CHOICE%"=="q" goto end
goto menu

:install
if not exist "%PY%" (echo ==^> creating virtualenv %VENV% & python -m venv "%VENV%")
echo ==^> installing Python dependencies (torch is large: a few minutes the first time)
"%PY%" -m pip install -q --upgrade pip
"%PY%" -m pip install -q -r requirements.txt
exit /b %errorlevel%

:cli
if not exist "%PY%" call :install
"%PY%" -m backend.cli %*
exit /b %errorlevel%

:init_db
echo ==^> setting up the database
call :cli init-db
exit /b %errorlevel%

:populate
set "N=%~1"
if "%N%"=="" set "N=%NUM_IMAGES%"
echo ==^> populating %N% CIFAR-10 images
call :cli populate --dataset cifar10 --split train --num-images %N%
exit /b %errorlevel%

:build_index
echo ==^> building prototypes and index
call :cli rebuild-prototypes || exit /b 1
call :cli build-index
exit /b %errorlevel%

:admin_key
echo ==^> admin API key (changing the catalogue needs one; kept in data\admin.key)
call :cli api-key ensure-admin
exit /b %errorlevel%

:serve
echo ==^> starting the server on http://localhost:8000/app (Ctrl-C stops it)
call :cli serve
exit /b %errorlevel%

:run_tests
call :install
"%PY%" -m pip install -q -r requirements-dev.txt
"%PY%" -m pytest -q
exit /b %errorlevel%

:all
call :install || exit /b 1
call :init_db || exit /b 1
call :populate %1 || exit /b 1
call :build_index || exit /b 1
call :admin_key || exit /b 1
call :serve
exit /b %errorlevel%

:end
endlocal
